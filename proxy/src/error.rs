//! The proxy's error type: what went wrong, whose fault it was, and how it looks to a client
//! (an OCI error body with the right status).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::disk::DiskError;
use crate::route::RouteError;

/// Which upstream a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Upstream {
    /// The in-cluster cache registry.
    Cache,
    /// The image's own registry.
    Origin,
}

impl Upstream {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Upstream::Cache => "cache",
            Upstream::Origin => "origin",
        }
    }
}

/// Everything that can go wrong serving one request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// The client asked for something malformed (its fault; do not retry).
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The upstream says the manifest or blob does not exist.
    #[error("{what} not found on {upstream}", upstream = upstream.as_str())]
    NotFound {
        what: &'static str,
        upstream: Upstream,
    },
    /// The upstream refused us (credentials needed or denied).
    #[error("{upstream} refused access ({status}): {detail}", upstream = upstream.as_str())]
    Denied {
        upstream: Upstream,
        status: StatusCode,
        detail: String,
    },
    /// The upstream rate-limits us; the client may retry later.
    #[error("{upstream} is rate limiting pulls", upstream = upstream.as_str())]
    RateLimited { upstream: Upstream },
    /// The upstream could not be reached or did not answer in time (retryable).
    #[error("{upstream} unavailable: {detail}", upstream = upstream.as_str())]
    Unavailable { upstream: Upstream, detail: String },
    /// The upstream answered with something unusable: a wrong digest, a truncated body, an
    /// oversized manifest, a status we do not understand. Never cached.
    #[error("{upstream} sent bad data: {detail}", upstream = upstream.as_str())]
    BadUpstream { upstream: Upstream, detail: String },
    /// The allow rules forbid reaching this registry or address (see [`crate::policy`]).
    #[error(transparent)]
    Refused(#[from] crate::policy::Refusal),
    /// Our own disk failed. The request may still be served without caching.
    #[error("disk tier: {0}")]
    Disk(String),
}

impl From<DiskError> for ProxyError {
    fn from(err: DiskError) -> Self {
        ProxyError::Disk(err.to_string())
    }
}

impl ProxyError {
    /// The HTTP status a client sees.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Route(e) => e.status(),
            ProxyError::NotFound { .. } => StatusCode::NOT_FOUND,
            ProxyError::Denied { status, .. } => match *status {
                StatusCode::FORBIDDEN => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            },
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadUpstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Refused(_) => StatusCode::FORBIDDEN,
            ProxyError::Disk(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OCI distribution error code.
    pub fn oci_code(&self) -> &'static str {
        match self {
            ProxyError::Route(e) => e.oci_code(),
            ProxyError::NotFound { what: "blob", .. } => "BLOB_UNKNOWN",
            // No such repository, or (referrers) an origin without the referrers API: clients
            // then fall back to the `sha256-<hex>` tag schema, as the spec says.
            ProxyError::NotFound {
                what: "tag list" | "referrers",
                ..
            } => "NAME_UNKNOWN",
            ProxyError::NotFound { .. } => "MANIFEST_UNKNOWN",
            ProxyError::Denied { status, .. } if *status == StatusCode::FORBIDDEN => "DENIED",
            ProxyError::Denied { .. } => "UNAUTHORIZED",
            ProxyError::RateLimited { .. } => "TOOMANYREQUESTS",
            ProxyError::Refused(_) => "DENIED",
            ProxyError::Unavailable { .. } => "UNAVAILABLE",
            ProxyError::BadUpstream { .. } | ProxyError::Disk(_) => "UNKNOWN",
        }
    }

    /// Whether asking again (another tier, or later) may succeed. A missing or refused image
    /// is an answer; an unreachable upstream is not.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProxyError::Unavailable { .. }
                | ProxyError::RateLimited { .. }
                | ProxyError::BadUpstream { .. }
                | ProxyError::Disk(_)
        )
    }

    /// A short, low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ProxyError::Route(_) => "bad_request",
            ProxyError::NotFound { .. } => "not_found",
            ProxyError::Denied { .. } => "denied",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::Unavailable { .. } => "unavailable",
            ProxyError::BadUpstream { .. } => "bad_upstream",
            ProxyError::Refused(_) => "refused",
            ProxyError::Disk(_) => "disk",
        }
    }
}

/// An OCI error response: `{"errors":[{"code":..,"message":..}]}`.
pub fn oci_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "errors": [{ "code": code, "message": message }] });
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let mut response = oci_error(self.status(), self.oci_code(), &self.to_string());
        if response.status() == StatusCode::UNAUTHORIZED {
            // containerd and skopeo send credentials only after a challenge.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"larder\""),
            );
        }
        response
    }
}
