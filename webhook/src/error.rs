//! The one error type of this crate: why the webhook could not start or keep serving.
//!
//! Admission reviews never produce an `Error`: whatever goes wrong with one review is answered
//! "allowed, unchanged" and counted (see [`crate::review`]).

use std::net::SocketAddr;

/// Why `larder webhook` could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag has a value that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An `--exclude-image` pattern is not a valid regular expression.
    #[error("invalid --exclude-image pattern `{pattern}`: {source}")]
    ExcludePattern {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    /// The webhook port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The webhook server failed while serving.
    #[error("webhook server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// Certificates could not be loaded or managed.
    #[error(transparent)]
    Certs(#[from] larder_certs::Error),
    /// No Kubernetes client could be made (self-managed certificates need one).
    #[error("cannot create a Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    /// The admin (metrics and probes) server failed.
    #[error(transparent)]
    Admin(#[from] larder_core::admin::AdminError),
    /// A background task panicked or was cancelled.
    #[error("{0} task ended abnormally")]
    Task(&'static str),
}

impl Error {
    /// A short, fixed label for metrics and logs: one per variant, never user data.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::ExcludePattern { .. } => "exclude_pattern",
            Error::Bind { .. } => "bind",
            Error::Serve(_) => "serve",
            Error::Certs(e) => e.metric_label(),
            Error::Kube(_) => "kube",
            Error::Admin(_) => "admin",
            Error::Task(_) => "task",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_fixed_strings() {
        assert_eq!(Error::Config("x".into()).metric_label(), "config");
        assert_eq!(Error::Task("admin").metric_label(), "task");
        let certs = Error::from(larder_certs::Error::Contended("s".into()));
        assert_eq!(certs.metric_label(), "contended");
    }
}
